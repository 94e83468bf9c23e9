"""The initiating side of a session: say HELLO, wait for WELCOME, then talk over a channel.

Used by a client attaching to a supernode and by a supernode opening a link to another one.
Sans-I/O: the caller feeds packets from the server's address and sends what `datagrams`
returns to it. Messages sent before the handshake completes wait in a queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.crypto import handshake
from punchline.identity.certs import Role
from punchline.session.channel import ChannelConfig, SecureChannel
from punchline.wire import session as wire

HELLO_RETRY = 0.4
HELLO_ATTEMPTS = 5


class State(Enum):
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    FAILED = "failed"


@dataclass(frozen=True)
class Identity:
    """Who this side is: the key, its certificate, and the CA everything is checked against."""

    key: Ed25519PrivateKey
    certificate: x509.Certificate
    ca: x509.Certificate


class OutboundSession:
    def __init__(
        self,
        identity: Identity,
        server_name: str,
        now: float,
        server_role: Role = Role.SUPERNODE,
        config: ChannelConfig | None = None,
    ) -> None:
        self.identity = identity
        self.server_name = server_name
        self.server_role = server_role
        self.config = config
        self.state = State.CONNECTING
        self.failure = ""
        self.problem = ""  # the last refusal or bad WELCOME seen while connecting
        self.started = now
        self.rtt: float | None = None
        self.channel: SecureChannel | None = None
        self.peer: handshake.Peer | None = None
        self._pending = handshake.start(
            identity.key, identity.certificate, "session", server_name, now
        )
        self._hello = wire.encode_hello(self._pending.hello)
        self._hello_sent = 0
        self._next_hello = now
        self._queue: list[tuple[dict[str, Any], bool]] = []

    def send(self, message: dict[str, Any], now: float, reliable: bool = True) -> None:
        if self.channel is None:
            self._queue.append((message, reliable))
        else:
            self.channel.send(message, now, reliable)

    def receive_untrusted(self, packet: wire.Packet, now: float) -> list[dict[str, Any]]:
        # REFUSED and WELCOME are not authenticated until the handshake completes: anyone who
        # can spoof the server's address could send them. So a refusal or a bad WELCOME is
        # remembered and the HELLO retried; the session fails only when the attempts run out,
        # with the last problem as its reason, and the genuine WELCOME still wins meanwhile.
        if isinstance(packet, wire.Refused) and self.state is State.CONNECTING:
            self.problem = f"refused: {packet.reason}"
            return []
        if isinstance(packet, wire.Welcome) and self.state is State.CONNECTING:
            try:
                peer, keys = self._pending.finish_untrusted(
                    packet.answer, self.identity.ca, now, self.server_role, self.server_name
                )
            except handshake.HandshakeError as exc:
                self.problem = str(exc)
                return []
            self.peer = peer
            self.rtt = now - self.started if self._hello_sent == 1 else None
            self.channel = SecureChannel(keys, now, self.config)
            self.state = State.ESTABLISHED
            for message, reliable in self._queue:
                self.channel.send(message, now, reliable)
            self._queue.clear()
            return []
        if isinstance(packet, wire.Sealed) and self.channel is not None:
            if packet.session_id != self.channel.session_id:
                return []
            return self.channel.receive_untrusted(packet, now)
        return []

    def datagrams(self, now: float) -> list[bytes]:
        if self.state is State.CONNECTING and now >= self._next_hello:
            if self._hello_sent >= HELLO_ATTEMPTS:
                self.state = State.FAILED
                self.failure = self.problem or "no answer from the server"
                return []
            self._hello_sent += 1
            self._next_hello = now + HELLO_RETRY * self._hello_sent
            return [self._hello]
        if self.channel is not None:
            return self.channel.datagrams(now)
        return []

    def next_timer(self) -> float:
        if self.state is State.CONNECTING:
            return self._next_hello
        if self.channel is not None:
            return self.channel.next_timer()
        return float("inf")

    def handle_timer(self, now: float) -> None:
        if self.channel is not None:
            self.channel.handle_timer(now)
            if self.channel.dead:
                self.state, self.failure = State.FAILED, "the server stopped answering"

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED
