"""The daemon's local control API: JSON lines over a Unix socket in the data dir, mode 0600.

Only the user who owns the data dir can reach it (the socket's mode and the 0700 directory),
so it needs no authentication of its own. One request per connection: a JSON object with
"op"; the daemon answers with one or more JSON lines (a call streams its progress events and
ends with the report).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from punchline.errors import LocalError
from punchline.util.jsontext import loads_untrusted

SOCKET_NAME = "control.sock"
MAX_REQUEST = 65536

Reply = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Reply], Awaitable[None]]


class DaemonNotRunning(LocalError):
    """No daemon answers on the data dir's control socket."""


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


async def serve(data_dir: Path, handler: Handler) -> asyncio.AbstractServer:
    path = socket_path(data_dir)
    if path.exists():
        if _answers(path):
            raise LocalError(f"a punchline daemon is already running for {data_dir}")
        path.unlink()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(message: dict[str, Any]) -> None:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()

        try:
            line = await reader.readline()
            request = loads_untrusted(line) if line else None
            if not isinstance(request, dict):
                await reply({"ok": False, "error": "request must be one JSON object per line"})
                return
            await handler(request, reply)
        except ValueError:
            await reply({"ok": False, "error": "request is not JSON"})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()

    old = os.umask(0o077)
    try:
        server = await asyncio.start_unix_server(connection, path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def request(data_dir: Path, message: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Send one request and yield every reply line until the daemon closes the connection."""
    path = socket_path(data_dir)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonNotRunning(
            f"no punchline daemon is running for {data_dir}; start it with `punchline up`"
        ) from exc
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        while line := await reader.readline():
            value = loads_untrusted(line)
            if isinstance(value, dict):
                yield value
    finally:
        writer.close()
