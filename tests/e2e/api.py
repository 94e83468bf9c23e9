"""Helpers for talking to a real login server the way any HTTPS client would."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.auth.launcher import AuthProcess
from punchline.client import account
from punchline.identity import keys


def http(server: AuthProcess) -> httpx.Client:
    """A client that trusts exactly this server's CA, with host-name checking on."""
    context = ssl.create_default_context(cafile=str(server.data_dir / "ca.crt"))
    return httpx.Client(base_url=server.url, verify=context, timeout=30)


def credentials(
    name: str, password: str, purpose: str = "signup", key: Ed25519PrivateKey | None = None
) -> dict[str, Any]:
    """A sign-up or login body with a fresh (or the given) key, as the client builds it."""
    return account.credentials_request(key or keys.generate(), purpose, name, password)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) >= {"error", "message"}, body
    assert body["message"], body
    return str(body["error"])
