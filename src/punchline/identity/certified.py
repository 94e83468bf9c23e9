"""Opening a signed document that carries its signer's user certificate.

Presence records, contact documents and directory entries are all read from the DHT, where
anyone can put anything: each is a signed document whose payload embeds the signer's user
certificate. The reading order matters and is the same for all three: the certificate is
checked against the CA first (at a time the document type chooses), and only its key may
open the signature. Each wire module maps the two failures below to its own error classes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from punchline.identity import certs, signed
from punchline.util.jsontext import loads_untrusted


class NotADocument(ValueError):
    """The thing is not a signed document with a JSON object payload."""


class Rejected(ValueError):
    """The certificate or the signature does not check out (`expired` when the certificate
    was genuine but not valid at the time asked)."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True)
class Certified:
    payload: dict[str, Any]  # what the signature covers
    signer: certs.CertInfo
    certificate_der: bytes
    checked_at: float  # when the certificate was found valid (what `checked_at` returned)


def open_certified(
    document: object,
    ca: x509.Certificate,
    context: str,
    checked_at: Callable[[dict[str, Any]], float],
) -> Certified:
    """Verify `document` under `context`; `checked_at(claimed)` says when the embedded
    certificate must have been valid, from the not-yet-verified payload (its own errors pass
    through untouched)."""
    if not isinstance(document, dict) or not isinstance(document.get("payload"), str):
        raise NotADocument("not a signed document")
    try:
        claimed = loads_untrusted(document["payload"])
    except ValueError as exc:
        raise Rejected(str(exc)) from exc
    if not isinstance(claimed, dict):
        raise NotADocument("payload must be an object")
    at = checked_at(claimed)
    try:
        der = base64.b64decode(str(claimed.get("cert")), validate=True)
        info = certs.verify(certs.load_untrusted(der), ca, at, certs.Role.USER)
        payload = signed.open_document_untrusted(info.public_key, context, document)
    except certs.CertificateExpired as exc:
        raise Rejected(str(exc), expired=True) from exc
    except (ValueError, binascii.Error, certs.CertificateError, signed.BadSignature) as exc:
        raise Rejected(str(exc)) from exc
    return Certified(payload, info, der, at)
