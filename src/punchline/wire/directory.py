"""Directory entries: a user's signed "find me by this display name", stored on the DHT.

OpenDHT's prefix-hash tree is not usable from Python (the binding's `Pht.lookup` matches exact
keys only and stores bare pointers), so the prefix index is built on the overlay's plain
put/get: the same signed entry is stored under "dir/<p>" for every prefix `p` of every term
(each word start of the normalized display name, and the user name) from `MIN_QUERY` up to
`MAX_PREFIX` characters. A search reads the one key of its query's first `MAX_PREFIX`
characters and keeps what really matches the whole query. That costs a bounded number of
puts per listed user and one get per search, whatever the size of the network.

Entries are signed by the user and carry the user certificate, so every reader verifies them
against the CA alone; a supernode cannot list someone who did not opt in, nor change a name.
Leaving the directory is an entry with `listed: false` and a higher sequence number: readers
keep the highest per user, so copies of the old entry still held by DHT nodes are hidden at
once instead of when they expire.
"""

from __future__ import annotations

import base64
import hashlib
import math
import unicodedata
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from punchline.errors import LocalError, RemoteError
from punchline.identity import certified, signed

CONTEXT = "directory"
KEY_PREFIX = "dir/"
MIN_QUERY = 2  # shorter queries would read keys holding a large part of the directory
MAX_PREFIX = 8  # longest indexed prefix; longer queries are filtered by the reader
MAX_DISPLAY = 64  # characters of a display name
MAX_WORDS = 4  # words of a display name that start a searchable term
MAX_RESULTS = 20  # per search: type more to narrow it down
ENTRY_LIFETIME = 86_400.0  # re-signed by the daemon while online; kept alive by custody


class DirectoryError(RemoteError):
    """An entry that is malformed, forged, expired or stored under a key it does not match."""


class ForgedEntry(DirectoryError):
    """The signature or certificate does not verify, or the entry names someone else."""


class InvalidDisplayName(LocalError):
    """A display name the directory cannot take; the message says why."""


def normalize(text: str) -> str:
    """The form names are compared in: no accents, case-folded, punctuation as spaces.

    "Élodie  O'Brien-Smith" -> "elodie obrien smith". Apostrophes join (so "obr" finds
    O'Brien), other punctuation and symbols separate words, whitespace collapses.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    out = []
    for ch in decomposed:
        category = unicodedata.category(ch)
        if unicodedata.combining(ch) or category in ("Cf", "Mn"):
            continue
        if ch in "'\u2019\u02bc":
            continue
        if category[0] in "PSZC":
            out.append(" ")
        else:
            out.append(ch)
    folded = unicodedata.normalize("NFKC", "".join(out)).casefold()
    return " ".join(folded.split())


def check_display(display: str) -> str:
    """The display name as it will be shown (trimmed), or `InvalidDisplayName`."""
    if not isinstance(display, str):
        raise InvalidDisplayName("a display name must be text")
    shown = " ".join(display.split())
    if not shown:
        raise InvalidDisplayName("the display name is empty")
    if len(shown) > MAX_DISPLAY:
        raise InvalidDisplayName(f"a display name has at most {MAX_DISPLAY} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in shown):
        raise InvalidDisplayName("a display name cannot contain control characters")
    if len(normalize(shown)) < MIN_QUERY:
        raise InvalidDisplayName(
            f"a display name needs at least {MIN_QUERY} letters or digits to be found"
        )
    return shown


def terms(user: str, display: str) -> list[str]:
    """What a query may be a prefix of: each word start of the display name, the user name."""
    words = normalize(display).split(" ")
    found = [" ".join(words[i:]) for i in range(min(len(words), MAX_WORDS))]
    found.append(normalize(user))
    return [t for t in dict.fromkeys(found) if t]


def keys_for(user: str, display: str) -> list[str]:
    """Every "dir/<prefix>" key the entry is stored under (a bounded number)."""
    keys: dict[str, None] = {}
    for term in terms(user, display):
        for length in range(MIN_QUERY, min(len(term), MAX_PREFIX) + 1):
            keys[KEY_PREFIX + term[:length]] = None
    return list(keys)


def query_key(query: str) -> tuple[str, str]:
    """(normalized query, the key to read), or `InvalidDisplayName` for a query too short."""
    wanted = normalize(query) if isinstance(query, str) else ""
    if len(wanted) < MIN_QUERY:
        raise InvalidDisplayName(f"search for at least {MIN_QUERY} letters or digits")
    if len(wanted) > MAX_DISPLAY:
        raise InvalidDisplayName(f"a search has at most {MAX_DISPLAY} characters")
    return wanted, KEY_PREFIX + wanted[:MAX_PREFIX]


def value_id(user: str) -> int:
    """One value per user under each key (63 bits, never 0)."""
    return (int.from_bytes(hashlib.sha256(b"dir\x00" + user.encode()).digest()[:8], "big") >> 1) | 1


@dataclass(frozen=True)
class Entry:
    user: str
    display: str
    listed: bool
    seq: int
    expires: float

    def matches(self, normalized_query: str) -> bool:
        return any(term.startswith(normalized_query) for term in terms(self.user, self.display))

    def as_json(self) -> dict[str, str]:
        return {"user": self.user, "display": self.display}


def make(
    key: Ed25519PrivateKey,
    certificate: x509.Certificate,
    user: str,
    display: str,
    seq: int,
    expires: float,
    listed: bool = True,
) -> dict[str, str]:
    payload = {
        "v": 1,
        "user": user,
        "display": check_display(display),
        "cert": base64.b64encode(certificate.public_bytes(Encoding.DER)).decode(),
        "listed": listed,
        "seq": seq,
        "expires": expires,
    }
    return signed.sign_document(key, CONTEXT, payload)


def verify_untrusted(document: object, ca: x509.Certificate, now: float) -> Entry:
    """Check an entry end to end; only `DirectoryError` escapes."""
    try:
        opened = certified.open_certified(document, ca, CONTEXT, lambda _claimed: now)
    except certified.NotADocument as exc:
        raise DirectoryError(f"directory entry: {exc}") from exc
    except certified.Rejected as exc:
        if exc.expired:
            raise DirectoryError(f"directory entry has expired: {exc}") from exc
        raise ForgedEntry(f"directory entry rejected: {exc}") from exc
    payload, info = opened.payload, opened.signer
    user, display, listed = payload.get("user"), payload.get("display"), payload.get("listed")
    seq, expires = payload.get("seq"), payload.get("expires")
    if payload.get("v") != 1:
        raise DirectoryError("unknown directory entry version")
    if user != info.subject:
        raise ForgedEntry(f"entry for {user!r} is signed by {info.subject!r}")
    if not isinstance(display, str) or not isinstance(listed, bool):
        raise DirectoryError("directory entry has no display name or listing flag")
    try:
        shown = check_display(display)
    except InvalidDisplayName as exc:
        raise DirectoryError(f"directory entry: {exc}") from exc
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        raise DirectoryError("directory entry has a malformed sequence number")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise DirectoryError("directory entry has a malformed expiry")
    if not math.isfinite(expires) or expires < now:
        raise DirectoryError("directory entry has expired")
    return Entry(info.subject, shown, listed, seq, float(expires))


def select(
    documents: list[dict[str, Any]], ca: x509.Certificate, now: float, normalized_query: str
) -> tuple[list[tuple[Entry, dict[str, Any]]], int]:
    """The listed users matching a query (newest entry per user, with its document, sorted by
    name) and how many documents were forged.

    Expired and malformed copies are dropped without counting as forged (the DHT keeps old
    copies around for a while); a user whose newest entry says unlisted is not shown.
    """
    newest: dict[str, tuple[Entry, dict[str, Any]]] = {}
    forged = 0
    for document in documents:
        try:
            entry = verify_untrusted(document, ca, now)
        except ForgedEntry:
            forged += 1
            continue
        except DirectoryError:
            continue
        current = newest.get(entry.user)
        if current is None or entry.seq > current[0].seq:
            newest[entry.user] = (entry, document)
    found = [(e, d) for e, d in newest.values() if e.listed and e.matches(normalized_query)]
    found.sort(key=lambda pair: (normalize(pair[0].display), pair[0].user))
    return found, forged
