"""tinyproxy (Debian package tinyproxy) as the HTTP CONNECT proxy of a restrictive network."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.interop.coturn import free_port, terminate

PROXY_USER, PROXY_PASSWORD = "proxyuser", "proxy-pass"


@contextlib.contextmanager
def tinyproxy(tmp_path: Path, connect_port: int) -> Iterator[int]:
    """tinyproxy in the foreground (-d) on loopback, Basic auth, CONNECT only to one port.

    Only `-c` config: the Debian default file would drop privileges to user tinyproxy and log
    under /var/log. Without a User line it keeps running as us (it warns when that is root).
    """
    binary = shutil.which("tinyproxy")
    if binary is None:
        unavailable("tinyproxy is not installed (Debian package tinyproxy)")
    assert binary is not None
    port = free_port()
    config = tmp_path / "tinyproxy.conf"
    log = tmp_path / "tinyproxy.log"
    config.write_text(
        f"Port {port}\n"
        "Listen 127.0.0.1\n"
        "Timeout 30\n"
        "MaxClients 10\n"
        "LogLevel Info\n"
        f'LogFile "{log}"\n'
        f'PidFile "{tmp_path / "tinyproxy.pid"}"\n'
        "Allow 127.0.0.1\n"
        f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}\n"
        f"ConnectPort {connect_port}\n"
    )
    with (tmp_path / "tinyproxy.out").open("wb") as out:
        process = subprocess.Popen(
            [binary, "-d", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = (tmp_path / "tinyproxy.out").read_text(errors="replace")
                    pytest.fail(f"tinyproxy did not start:\n{output}")
                time.sleep(0.05)
        yield port
    finally:
        terminate(process)
