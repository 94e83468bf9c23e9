"""When to renew a certificate: a pure policy the CLI and the daemon both follow.

Renewal starts once two thirds of the lifetime have passed, leaving a third (8 h of a 24 h
certificate) for the login server to be unreachable before the user notices anything.
"""

from __future__ import annotations

from punchline.identity.certs import CertInfo

RENEW_AFTER_FRACTION = 2 / 3


def renew_at(info: CertInfo) -> float:
    return info.not_before + info.lifetime * RENEW_AFTER_FRACTION


def due(info: CertInfo, now: float) -> bool:
    return now >= renew_at(info)
