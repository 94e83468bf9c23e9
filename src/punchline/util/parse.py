"""Parsers for what operators type: HOST:PORT and durations like 90s, 24h, 7d."""

from __future__ import annotations

import re

from punchline.errors import LocalError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    match = re.fullmatch(
        r"\[([0-9a-fA-F:.]+)\](?::([0-9]{1,5}))?|([^:\[\]]*):([0-9]{1,5})|([^:\[\]]+)",
        text.strip(),
    )
    if not match:
        raise LocalError(f"expected HOST:PORT, got {text!r}")
    host = match.group(1) or match.group(3) or match.group(5) or ""
    port_text = match.group(2) or match.group(4)
    if port_text is None:
        if default_port is None:
            raise LocalError(f"expected HOST:PORT, got {text!r} (no port)")
        return host, default_port
    port = int(port_text)
    if not 0 <= port < 65536:
        raise LocalError(f"port {port} is out of range")
    return host, port


def duration(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise LocalError(f"expected a duration like 90s, 30m, 24h or 7d, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]
