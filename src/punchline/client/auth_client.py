"""HTTPS client for the login server, trusting only the CA this data dir pinned.

On first contact the CA certificate is fetched over an unverified connection (trust on first
use, or checked against `--ca-fingerprint`); from then on every connection verifies the
server's TLS certificate against that CA and host name. When verification fails because the
server now presents another CA, the user gets the pinned and presented fingerprints, not an
OpenSSL error.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx
from cryptography import x509

from punchline.client.store import CAMismatch, ca_changed_message
from punchline.errors import LocalError, RemoteError, SecurityError
from punchline.identity import certs
from punchline.wire.auth_api import SIGNATURE_HEADER, Refusal


class ServerUnreachable(RemoteError):
    """The login server did not answer."""


# The login server's refusal, as the client sees it.
AuthRefused = Refusal


def _ssl_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _check_url(url: str) -> str:
    parsed = httpx.URL(url)
    if parsed.scheme != "https" or not parsed.host:
        raise LocalError(f"login server URL must look like https://host:port, not {url!r}")
    return url.rstrip("/")


def fetch_ca_unverified(url: str, timeout: float = 10.0) -> x509.Certificate:
    """First contact: get the CA certificate the server claims, to be pinned or compared."""
    url = _check_url(url)
    try:
        with httpx.Client(verify=False, timeout=timeout) as http:  # noqa: S501 - TOFU step
            response = http.get(url + "/v1/ca")
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"cannot reach the login server at {url}: {exc}") from exc
    try:
        return certs.load_untrusted(response.json()["ca_certificate"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"{url} does not look like a punchline login server") from exc


# The HTTP CONNECT proxy this process reaches the login server through (`punchline up
# --proxy`); like HTTPS_PROXY, which httpx honours too, it is a setting of the whole process.
_proxy: str | None = None


def use_proxy(url: str | None) -> None:
    global _proxy  # noqa: PLW0603 - one process, one way out
    _proxy = url


class AuthClient:
    def __init__(self, url: str, ca: x509.Certificate, timeout: float = 10.0) -> None:
        self.url = _check_url(url)
        self.ca = ca
        context = ssl.create_default_context(cadata=certs.to_pem(ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._http = httpx.Client(base_url=self.url, verify=context, timeout=timeout,
                                  proxy=_proxy)  # fmt: skip

    def __enter__(self) -> AuthClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path, None, {})

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, json.dumps(body).encode(), {})

    def post_signed(self, path: str, body: bytes, signature: str) -> dict[str, Any]:
        return self._request("POST", path, body, {SIGNATURE_HEADER: signature})

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", **headers}
        try:
            response = self._http.request(method, path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._explain(exc) from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise RemoteError(f"login server sent a non-JSON answer (HTTP {response.status_code})")
        if response.status_code >= 400:
            retry = float(response.headers.get("Retry-After", "0") or 0)
            raise AuthRefused(
                response.status_code,
                str(data.get("error", "error")),
                str(data.get("message", response.reason_phrase)),
                retry,
            )
        return data

    def _explain(self, exc: httpx.HTTPError) -> Exception:
        verify = _ssl_error(exc)
        if verify is None:
            return ServerUnreachable(f"cannot reach the login server at {self.url}: {exc}")
        try:
            presented = certs.ca_fingerprint(fetch_ca_unverified(self.url))
        except RemoteError:
            presented = "unknown"
        pinned = certs.ca_fingerprint(self.ca)
        if presented != pinned:
            return CAMismatch(ca_changed_message(pinned, presented))
        return SecurityError(
            f"the login server's TLS certificate was rejected ({verify.verify_message}); "
            f"if you reach it by a name it does not know, start it with --name <that name>"
        )
