"""A node's side of enrolment: prove the operator secret and the key, get a node certificate.

The node keeps its key, certificate and pinned CA in its own data dir through the same
`IdentityStore` users have (its node id in place of a user name), so the same offline
verification and pinning rules apply. Heartbeats keep it in the CA-signed bootstrap list.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from punchline.client import account
from punchline.client.auth_client import AuthClient
from punchline.client.store import IdentityStore, Profile
from punchline.errors import LocalError
from punchline.identity import certs, keys, signed
from punchline.relay import credentials
from punchline.util.files import atomic_write
from punchline.util.parse import host_port
from punchline.wire.auth_api import NODE_TRANSPORTS


@dataclass(frozen=True)
class NodeAddress:
    transport: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> NodeAddress:
        """`TRANSPORT:HOST:PORT`, e.g. `udp:…`, `tls:…`, `turn-udp:…` (IPv6 hosts in brackets)."""
        transport, _, rest = text.partition(":")
        if transport not in NODE_TRANSPORTS or not rest:
            raise LocalError(f"address must look like udp:HOST:PORT, tcp:… or tls:…, not {text!r}")
        host, port = host_port(rest)
        return cls(transport, host, port)

    def as_json(self) -> dict[str, Any]:
        return {"transport": self.transport, "host": self.host, "port": self.port}


def enroll(
    store: IdentityStore,
    url: str,
    secret: str,
    roles: Iterable[certs.Role],
    addresses: Iterable[NodeAddress],
    ca_fingerprint: str | None = None,
) -> account.Identity:
    role_list = sorted({certs.Role(r) for r in roles}, key=lambda r: r.value)
    key = store.key()
    node_id = keys.key_id(key.public_key())
    ts = int(time.time())
    request = {
        "secret": secret,
        "public_key": keys.public_to_text(key.public_key()),
        "roles": [r.value for r in role_list],
        "addresses": [a.as_json() for a in addresses],
        "ts": ts,
        "proof": signed.make_proof(key, "enroll", node_id, ts),
    }
    http = account.connect(store, url, ca_fingerprint)
    with http:
        answer = http.post("/v1/nodes/enroll", request)
        store.pin(http.ca)
        profile = Profile(node_id, http.url, certs.ca_fingerprint(http.ca))
        store.save_credentials(profile, str(answer.get("certificate")), role_list[0])
    return account.current(store, time.time(), role_list[0])


def heartbeat(
    store: IdentityStore, addresses: Iterable[NodeAddress] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """Tell the login server this node is alive; returns the verified bootstrap list."""
    profile = store.require_profile()
    ca = store.pinned_ca()
    if ca is None:
        raise LocalError(f"{store.dir} holds no pinned CA; enrol first")
    extra = {} if addresses is None else {"addresses": [a.as_json() for a in addresses]}
    body, signature = account.signed_request(store.key(), certs.to_pem(store.certificate()), extra)
    with AuthClient(profile.auth_url, ca, timeout) as http:
        answer = http.post_signed("/v1/nodes/heartbeat", body, signature)
    secret = answer.get("turn_secret")
    if isinstance(secret, str) and secret:  # relays: the secret behind users' TURN credentials
        atomic_write(store.dir / credentials.SECRET_FILE, (secret + "\n").encode(), 0o600)
    return store.save_bootstrap(answer.get("bootstrap"))
