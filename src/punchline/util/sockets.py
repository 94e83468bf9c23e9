"""Sockets that need more care than one bind() call."""

from __future__ import annotations

import socket

from punchline.errors import LocalError


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp_socket(host: str, port: int) -> socket.socket:
    """A bound UDP socket (closed again if the bind fails)."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def tcp_listener(host: str, port: int, backlog: int = 512) -> socket.socket:
    listener = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def udp_and_tcp(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a TCP listener on the same port number.

    Servers that speak one protocol over both (STUN/TURN on 3478, our supernode sessions)
    advertise a single port. With port 0 the kernel picks a UDP port that TCP may already use
    elsewhere on the machine, so pick again until both binds succeed.
    """
    for _attempt in range(50 if port == 0 else 1):
        udp: socket.socket | None = None
        try:
            udp = udp_socket(host, port)
            return udp, tcp_listener(host, int(udp.getsockname()[1]))
        except OSError as exc:
            if udp is not None:
                udp.close()
            if port != 0:
                raise LocalError(f"cannot listen on {host} port {port}: {exc.strerror}") from exc
    raise LocalError(f"no port on {host} is free for both UDP and TCP")
