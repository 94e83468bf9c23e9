"""HOST:PORT and duration parsing."""

from __future__ import annotations

import pytest

from punchline.errors import LocalError
from punchline.util.parse import duration, host_port


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("127.0.0.1:80", None, ("127.0.0.1", 80)),
        ("[::1]:443", None, ("::1", 443)),
        ("[2001:db8::1]:65535", None, ("2001:db8::1", 65535)),
        ("host:0", None, ("host", 0)),
        ("example.org:8443", 443, ("example.org", 8443)),
        ("example.org", 443, ("example.org", 443)),
        ("  example.org:1  ", None, ("example.org", 1)),
        ("localhost", 0, ("localhost", 0)),
    ],
)
def test_host_port(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert host_port(text, default) == expected


def test_missing_port_without_default() -> None:
    with pytest.raises(LocalError, match="no port"):
        host_port("example.org")


@pytest.mark.parametrize("text", ["host:65536", "host:99999", "[::1]:70000"])
def test_port_out_of_range(text: str) -> None:
    with pytest.raises(LocalError, match="out of range"):
        host_port(text)


@pytest.mark.parametrize(
    "text", ["", "   ", "a:b:c", "::1:80", "[::1", "host:port", "host:-1", "[host]:80", "h:8 0"]
)
def test_host_port_garbage(text: str) -> None:
    with pytest.raises(LocalError, match="HOST:PORT"):
        host_port(text, 80)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("30m", 1800.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("15", 15.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        (" 5 m ", 300.0),
    ],
)
def test_duration(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "", "s", "-5s", "5w", "5 5s", "1e3s", ".5h", "5ms"])
def test_duration_garbage(text: str) -> None:
    with pytest.raises(LocalError, match="duration"):
        duration(text)


def test_bracketed_ipv6_without_port_takes_the_default() -> None:
    assert host_port("[::1]", 443) == ("::1", 443)


@pytest.mark.parametrize("text", ["host:" + "9" * 5000, "host:١٢٣"])
def test_hostile_ports_are_local_errors(text: str) -> None:
    with pytest.raises(LocalError):
        host_port(text)
