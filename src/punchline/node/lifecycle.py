"""What every infrastructure node does to exist: enrol once, heartbeat, renew its certificate.

Supernodes and relays (and a supernode that is also a relay) share this, so a node's identity
rules — pinned CA, certificate re-issued when a third of its lifetime is left, the bootstrap
list refreshed with every heartbeat — are the same for every role.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from punchline.client import account
from punchline.client.store import IdentityStore
from punchline.errors import LocalError
from punchline.identity import certs
from punchline.node import enrolment
from punchline.node.enrolment import NodeAddress
from punchline.session.outbound import Identity

log = structlog.get_logger(component="node")


def stored_identity(
    store: IdentityStore, now: float, roles: frozenset[certs.Role]
) -> Identity | None:
    """The node identity in the data dir if its certificate carries every one of `roles` and
    is valid for a while yet (a third of its lifetime), else None: time to enrol again."""
    ca = store.pinned_ca()
    if ca is None or not store.cert_path.exists():
        return None
    cert = store.certificate()
    info = certs.verify(cert, ca, now, min(roles, key=lambda r: r.value))
    if not roles <= info.roles or info.not_after - now < info.lifetime / 3:
        return None
    return Identity(store.key(), cert, ca)


def ensure_enrolled(
    store: IdentityStore,
    auth_url: str,
    secret: str | None,
    roles: Iterable[certs.Role],
    addresses: list[NodeAddress],
    ca_fingerprint: str | None,
) -> Identity:
    """The stored identity when it still carries every role, else a fresh enrolment."""
    wanted = frozenset(roles)
    now = time.time()
    try:
        identity = stored_identity(store, now, wanted)
    except Exception:  # any problem with the stored identity: enrol afresh
        identity = None
    if identity is not None:
        return identity
    if not secret:
        raise LocalError(
            "this node is not enrolled yet: give the operator's secret with "
            "--enroll-secret or PUNCHLINE_ENROLL_SECRET"
        )
    enrolment.enroll(store, auth_url, secret, wanted, addresses, ca_fingerprint)
    identity = stored_identity(store, now, wanted)
    assert identity is not None
    return identity


def tls_context(store: IdentityStore) -> ssl.SSLContext:
    """Server-side TLS with the node certificate (what TCP 443/80 listeners present)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(store.cert_path, store.key_path)
    return context


async def heartbeats(
    store: IdentityStore,
    addresses: list[NodeAddress],
    interval: float,
    role: certs.Role,
    on_listing: Callable[[dict[str, Any]], None],
    on_renewed: Callable[[], None],
) -> None:
    """Forever: heartbeat (which returns the bootstrap list), then renew the certificate if due."""
    while True:
        try:
            listing = await asyncio.to_thread(enrolment.heartbeat, store, addresses)
            on_listing(listing)
            freshness = await asyncio.to_thread(account.ensure_fresh, store, time.time(), 10.0,
                                                role)  # fmt: skip
            if freshness.renewed:
                on_renewed()
        except Exception as exc:  # the login server may be away
            log.warning("heartbeat failed", error=str(exc))
        await asyncio.sleep(interval)


class NodeServer(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_until_signalled(server: NodeServer, farewell: Callable[[], None]) -> None:
    """Start `server`, serve until SIGINT or SIGTERM, then say goodbye and stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        farewell()
        with contextlib.suppress(Exception):
            await server.stop()
