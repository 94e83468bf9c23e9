"""The daemon's way out through a relay node: pick one, get credentials, allocate, keep it.

Relays come from the CA-signed bootstrap list (role `relay`, addresses `turn-udp`, `turn-tcp`,
`turn-tls`), credentials from the login server (TURN REST API scheme, a day's validity, cached
in memory and fetched again when a third of their life is left). The transports are tried in
the order a restrictive network is most likely to allow them last: UDP, TCP, TLS on 443, and
TLS through the HTTP CONNECT proxy when one is configured. TLS checks the relay's node
certificate against the pinned CA under the node's DNS name, so a proxy or middlebox cannot
pose as the relay (it could only drop traffic; the media inside is end-to-end encrypted anyway).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from punchline.client import account
from punchline.client.store import IdentityStore
from punchline.errors import LocalError, PunchlineError
from punchline.identity import certs
from punchline.relay.connection import (
    ProxyConfig,
    RelayServer,
    RelayUnavailable,
    TurnConnection,
    open_turn,
)
from punchline.relay.credentials import TurnCredentials

log = structlog.get_logger(component="relay-path")

TRANSPORT_CHOICES = ("auto", "udp", "tcp", "tls", "proxy")
_LADDER = ("udp", "tcp", "tls", "proxy")


@dataclass(frozen=True)
class RelayNode:
    node_id: str
    # "udp"/"tcp"/"tls" -> (host, port) in the listed order (TLS: typically 443, then 80)
    addresses: dict[str, list[tuple[str, int]]]


def relays_in(listing: dict[str, Any]) -> list[RelayNode]:
    """The relay nodes of a (verified) bootstrap list, in its order."""
    found = []
    for node in listing.get("nodes", []):
        if "relay" not in node.get("roles", []):
            continue
        addresses: dict[str, list[tuple[str, int]]] = {}
        for address in node.get("addresses", []):
            transport = str(address.get("transport", ""))
            if transport.startswith("turn-"):
                where = (str(address["host"]), int(address["port"]))
                addresses.setdefault(transport[5:], []).append(where)
        if addresses:
            found.append(RelayNode(str(node["node_id"]), addresses))
    return found


def _steps(transport: str, proxy: ProxyConfig | None, start: str = "udp") -> list[str]:
    if transport == "auto":
        ladder = _LADDER[_LADDER.index(start) :]
        return [s for s in ladder if s != "proxy" or proxy is not None]
    if transport == "proxy" and proxy is None:
        raise LocalError("--relay-transport proxy needs --proxy URL (or HTTPS_PROXY)")
    return [transport]


class RelayPath:
    def __init__(
        self,
        store: IdentityStore,
        on_data: Callable[[bytes, tuple[str, int]], None],
        transport: str = "auto",
        proxy: ProxyConfig | None = None,
        step_timeout: float = 3.0,
        start: str = "udp",
    ) -> None:
        """`start`: the first rung of the auto ladder worth trying (what the network is known
        to let through: a daemon that reached its supernode only over TCP skips UDP)."""
        if transport not in TRANSPORT_CHOICES:
            raise LocalError(f"relay transport must be one of {', '.join(TRANSPORT_CHOICES)}")
        self.store = store
        self.on_data = on_data
        self.transport = transport
        self.proxy = proxy
        self.step_timeout = step_timeout
        if start not in _LADDER:
            raise LocalError(f"relay ladder rung must be one of {', '.join(_LADDER)}")
        self.start = start
        self._credentials: TurnCredentials | None = None
        self._issued_at = 0.0
        self.connection: TurnConnection | None = None
        self.node: RelayNode | None = None
        self.server: RelayServer | None = None

    @property
    def label(self) -> str:
        """How media travels, for call reports: relay-udp, relay-tcp, relay-tls, relay-proxy."""
        if self.connection is None:
            return "none"
        return "relay-" + self.connection.transport.replace("tls+proxy", "proxy")

    async def _fresh_credentials(self) -> TurnCredentials:
        now = time.time()
        creds = self._credentials
        if creds is None or creds.expires - now < (creds.expires - self._issued_at) / 3:
            creds = await asyncio.to_thread(account.turn_credentials, self.store)
            self._credentials, self._issued_at = creds, now
        return creds

    def _tls(self) -> ssl.SSLContext:
        ca = self.store.pinned_ca()
        if ca is None:
            raise LocalError(f"{self.store.dir} holds no pinned CA; log in first")
        return ssl.create_default_context(cadata=certs.to_pem(ca))

    async def open(self) -> TurnConnection:
        """An allocation on the first relay and transport that works; RelayUnavailable if none."""
        listing = self.store.bootstrap() or {}
        relays = relays_in(listing)
        if not relays:
            raise RelayUnavailable("the bootstrap list names no relay node")
        creds = await self._fresh_credentials()
        failures = []
        for step in _steps(self.transport, self.proxy, self.start):
            for node, server in ((n, s) for n in relays for s in self._servers(n, step)):
                try:
                    self.connection = await open_turn(
                        server, creds.username, creds.password, on_data=self.on_data,
                        proxy=self.proxy if step == "proxy" else None,
                        ssl_context=self._tls() if server.transport == "tls" else None,
                        timeout=self.step_timeout,
                    )  # fmt: skip
                except PunchlineError as exc:
                    failures.append(f"{step} to {node.node_id[:12]} port {server.port}: {exc}")
                    log.info("relay attempt failed", relay=node.node_id, transport=step,
                             reason=str(exc))  # fmt: skip
                    continue
                self.node, self.server = node, server
                log.info("relay allocated", relay=node.node_id, transport=self.label,
                         server=str(server), relayed=self.connection.relayed)  # fmt: skip
                return self.connection
        raise RelayUnavailable("no relay could be reached: " + "; ".join(failures or ["none"]))

    @staticmethod
    def _servers(node: RelayNode, step: str) -> list[RelayServer]:
        kind = "tls" if step == "proxy" else step
        hostname = certs.node_dns_name(node.node_id) if kind == "tls" else None
        return [RelayServer(kind, h, p, hostname) for h, p in node.addresses.get(kind, [])]

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    def status(self) -> dict[str, Any] | None:
        if self.connection is None or self.node is None:
            return None
        return {
            "node_id": self.node.node_id,
            "transport": self.label,
            "server": None if self.server is None else [self.server.host, self.server.port],
            "relayed": list(self.connection.relayed),
            "counters": dict(self.connection.counters),
        }
