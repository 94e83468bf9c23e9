"""One port number for UDP and TCP (servers that advertise a single port)."""

from __future__ import annotations

import socket

import pytest

from punchline.errors import LocalError
from punchline.util import sockets


def test_any_port_gives_the_same_number_for_both() -> None:
    for _ in range(20):
        udp, tcp = sockets.udp_and_tcp("127.0.0.1", 0)
        try:
            assert udp.getsockname() == tcp.getsockname()
            assert udp.type == socket.SOCK_DGRAM
            assert tcp.type == socket.SOCK_STREAM
        finally:
            udp.close()
            tcp.close()


def test_a_fixed_port_taken_for_tcp_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LocalError, match=f"port {port}"):
            sockets.udp_and_tcp("127.0.0.1", port)
