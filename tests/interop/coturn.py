"""Launching coturn's `turnserver` (Debian package `coturn`) on loopback for interop tests.

Everything it writes (pid file, database, log) goes to the test's tmp_path, so tests run in
parallel and as any user. `-n` ignores /etc/turnserver.conf; `--no-cli` keeps it off the fixed
telnet CLI port 5766 (it starts without it too, but logs a CONFIG ERROR about the empty CLI
password). There is no `--rfc5780` flag in the packaged 4.6: NAT behaviour discovery answers
come with a second `--listening-ip`/`--alt-listening-port` instead.

`turnserver()` returns only once the server answers on every port it was asked to open, so
tests need no retry loops of their own; if the process dies or stays silent the test fails
with the tail of coturn's log, which says why (bad option, port in use, unreadable cert).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from punchline.wire import stun
from tests.conftest import unavailable

STARTUP_SECONDS = 20.0


def tool(name: str) -> str:
    """The path of a coturn tool, or skip (fail under CI) when coturn is not installed."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian package coturn; tools/run installs it)")
    assert path is not None
    return path


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now (coturn listens on both)."""
    for _ in range(50):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        ):
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no loopback port is free for both UDP and TCP")


@dataclass(frozen=True)
class Coturn:
    port: int  # UDP, and TCP when started with tcp=True
    tls_port: int | None
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no turnserver log)"
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def turnserver(
    tmp_path: Path,
    *extra: str,
    tcp: bool = False,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[Coturn]:
    """coturn on 127.0.0.1: UDP always, TCP on the same port with `tcp`, TLS on a second port
    with `tls=(certificate, key)` (PEM files). DTLS stays off. `extra` are more options."""
    binary = tool("turnserver")
    port = free_port()
    tls_port = free_port() if tls is not None else None
    log = tmp_path / "turnserver.log"
    argv = [
        binary,
        "-n",
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        f"--listening-port={port}",
        "--no-dtls",
        "--no-cli",
        f"--pidfile={tmp_path / 'turnserver.pid'}",
        f"--db={tmp_path / 'turndb'}",
        "--log-file=stdout",
        "--simple-log",
    ]
    if not tcp:
        argv.append("--no-tcp")
    if tls is None:
        argv.append("--no-tls")
    else:
        certificate, key = tls
        argv += [f"--tls-listening-port={tls_port}", f"--cert={certificate}", f"--pkey={key}"]
    argv += extra
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    server = Coturn(port, tls_port, log)
    try:
        _wait_ready(process, server, tcp)
        yield server
    finally:
        terminate(process)


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not gone after 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_ready(process: subprocess.Popen[bytes], server: Coturn, tcp: bool) -> None:
    """Until coturn answers a Binding request over UDP and accepts its TCP/TLS connections."""
    deadline = time.monotonic() + STARTUP_SECONDS
    tcp_ports = [server.port] if tcp else []
    if server.tls_port is not None:
        tcp_ports.append(server.tls_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        request = stun.binding_request()
        while True:
            if process.poll() is not None:
                pytest.fail(f"turnserver exited with {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"turnserver did not come up:\n{server.log_tail()}")
            try:
                sock.sendto(request, ("127.0.0.1", server.port))
                if sock.recv(2048)[8:20] == request[8:20]:
                    break
            except OSError:  # timeout, or ICMP port unreachable while it starts
                time.sleep(0.05)
    for port in tcp_ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"turnserver is not listening on TCP {port}:\n{server.log_tail()}")
                time.sleep(0.05)
