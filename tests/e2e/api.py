"""Helpers for talking to a real login server the way any HTTPS client would."""

from __future__ import annotations

import ssl
import time
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.auth.launcher import AuthProcess
from punchline.identity import keys, signed


def http(server: AuthProcess) -> httpx.Client:
    """A client that trusts exactly this server's CA, with host-name checking on."""
    context = ssl.create_default_context(cafile=str(server.data_dir / "ca.crt"))
    return httpx.Client(base_url=server.url, verify=context, timeout=30)


def credentials(
    name: str, password: str, purpose: str = "signup", key: Ed25519PrivateKey | None = None
) -> dict[str, Any]:
    key = key or keys.generate()
    ts = int(time.time())
    return {
        "name": name,
        "password": password,
        "public_key": keys.public_to_text(key.public_key()),
        "ts": ts,
        "proof": signed.make_proof(key, purpose, name, ts),
    }


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) >= {"error", "message"}, body
    assert body["message"], body
    return str(body["error"])
