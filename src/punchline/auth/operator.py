"""Operator actions on accounts, run against the database directly (the server may be running).

A disabled account can no longer log in or renew; certificates it already holds expire within
the user-certificate lifetime (24 h by default), which is why that lifetime is short.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from punchline.auth.db import Account, IssuedCertificate
from punchline.errors import LocalError
from punchline.identity import names


class UnknownAccount(LocalError):
    """The operator named an account that does not exist."""


@dataclass(frozen=True)
class AccountSummary:
    name: str
    created_at: float
    disabled: bool
    certificates: int


def set_disabled(sessions: sessionmaker[Session], name: str, disabled: bool, now: float) -> bool:
    """Disable or enable; returns whether anything changed."""
    canonical = names.canonical(name)
    with sessions() as session, session.begin():
        account = session.scalars(select(Account).where(Account.name == canonical)).one_or_none()
        if account is None:
            raise UnknownAccount(f"no account named {canonical!r}")
        changed = account.disabled != disabled
        account.disabled = disabled
        account.disabled_at = now if disabled else None
        return changed


def list_accounts(sessions: sessionmaker[Session]) -> list[AccountSummary]:
    with sessions() as session:
        per_subject = select(IssuedCertificate.subject, func.count()).group_by(
            IssuedCertificate.subject
        )
        # a Result has .keys(), so dict() would treat it as a mapping: unpack rows explicitly
        counts = {subject: count for subject, count in session.execute(per_subject).tuples()}
        return [
            AccountSummary(a.name, a.created_at, a.disabled, counts.get(a.name, 0))
            for a in session.scalars(select(Account).order_by(Account.name))
        ]
