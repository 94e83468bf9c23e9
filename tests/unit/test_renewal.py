"""When a certificate is due for renewal."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from punchline.client.renewal import due, renew_at
from punchline.identity import certs, keys

if TYPE_CHECKING:
    from tests.unit.conftest import CA, IssueFn


def info(not_before: float, not_after: float) -> certs.CertInfo:
    return certs.CertInfo(
        subject="alice",
        roles=frozenset({certs.Role.USER}),
        serial=1,
        not_before=not_before,
        not_after=not_after,
        public_key=keys.generate().public_key(),
    )


def test_renew_at_two_thirds() -> None:
    assert renew_at(info(1000.0, 4000.0)) == pytest.approx(3000.0)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (1000.0, False),
        (2000.0, False),
        (2999.0, False),
        (3000.0, True),
        (3500.0, True),
        (5000.0, True),
    ],
)
def test_due(now: float, expected: bool) -> None:
    assert due(info(1000.0, 4000.0), now) is expected


def test_due_for_a_real_24h_certificate(ca: CA, issue: IssueFn, now: int) -> None:
    cert_info = certs.verify(issue(lifetime=86_400), ca.cert, now)
    eight_hours_left = cert_info.not_after - 8 * 3600
    assert not due(cert_info, now)
    assert not due(cert_info, eight_hours_left - 300)
    assert due(cert_info, eight_hours_left)
