"""User-name rules: what a punchline name may be and how it is compared.

Names are compared after Unicode NFKC normalisation and case folding, so "Alice" and "alice"
are one account. The allowed alphabet is deliberately ASCII: names travel in certificates,
DHT keys and SIP URIs, and look-alike characters from other scripts would make impersonation
easy. A name must start with a letter so that it can never be confused with a phone number.
"""

from __future__ import annotations

import re
import unicodedata

from punchline.errors import LocalError

MIN_LENGTH = 3
MAX_LENGTH = 32
ALLOWED = re.compile(r"[a-z0-9._-]")
RESERVED = frozenset(
    {
        "abuse", "admin", "administrator", "all", "anonymous", "auth", "billing", "ca",
        "echo", "everyone", "gateway", "help", "hostmaster", "info", "login", "me",
        "nobody", "noreply", "null", "operator", "postmaster", "pstn", "punchline", "relay",
        "root", "security", "self", "skype", "superuser", "supernode", "support", "system",
        "voicemail", "webmaster",
    }
)  # fmt: skip


class InvalidName(LocalError):
    """The name breaks one of the rules; the message says which."""


def canonical(name: str) -> str:
    """Return the canonical form of a user name or raise `InvalidName` saying why not."""
    if not isinstance(name, str):
        raise InvalidName("user name must be text")
    folded = unicodedata.normalize("NFKC", name).casefold()
    if len(folded) < MIN_LENGTH:
        raise InvalidName(f"user name must be at least {MIN_LENGTH} characters long")
    if len(folded) > MAX_LENGTH:
        raise InvalidName(f"user name must be at most {MAX_LENGTH} characters long")
    for ch in folded:
        if not ALLOWED.fullmatch(ch):
            raise InvalidName(
                f"user name contains {ch!r}, which is not allowed; "
                "use letters a-z, digits, '.', '_' or '-'"
            )
    if not folded[0].isalpha():
        raise InvalidName("user name must start with a letter")
    if not folded[-1].isalnum():
        raise InvalidName("user name must end with a letter or digit")
    if re.search(r"[._-]{2}", folded):
        raise InvalidName("user name cannot have two punctuation characters in a row")
    if folded in RESERVED:
        raise InvalidName(f"user name {folded!r} is reserved")
    return folded
