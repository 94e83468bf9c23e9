"""What both ends of the login server's HTTPS API agree on: names, labels, the error shape.

Errors travel as `{"error": code, "message": text}` with a 4xx/5xx status and, for throttling,
a `Retry-After` header; both sides represent one as `Refusal`.
"""

from __future__ import annotations

from typing import Any

from punchline.errors import RemoteError
from punchline.util.jsontext import loads_object_untrusted

SIGNATURE_HEADER = "X-Punchline-Signature"
# Context labels of the signatures (see identity.signed): request bodies, the bootstrap list.
REQUEST_CONTEXT = "request"
BOOTSTRAP_CONTEXT = "bootstrap"
# How nodes can be reached, as listed in the bootstrap list: a supernode's session ports
# (udp, tcp, and tls on 443/80), its DHT port, and a relay's TURN ports (RFC 8656 over UDP,
# TCP, and TLS which also serves HTTP CONNECT tunnels).
NODE_TRANSPORTS = ("udp", "tcp", "tls", "dht", "turn-udp", "turn-tcp", "turn-tls")


class Refusal(RemoteError):
    """The login server refused a request: HTTP status, machine code, message for a person."""

    def __init__(self, status: int, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def as_json(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


def decode_object_untrusted(body: bytes) -> dict[str, Any]:
    """A request body must be one JSON object; anything else is a 400 `bad_json`."""
    try:
        return loads_object_untrusted(body)
    except ValueError as exc:
        raise Refusal(400, "bad_json", f"request body {exc}") from exc
