"""Custody: a supernode keeps documents alive in the DHT by putting them again and again.

OpenDHT drops a value 10 minutes after its last put and never re-replicates after churn, so
whoever wants a document to live must re-put it: the user's supernode for its attached users'
presence records (and their "offline" records for 72 hours), custodians picked by rendezvous
hashing for offline records whose supernode may die, and the contacts/directory services for
their documents. The first re-put comes early (puts soon after start-up can land on the wrong
nodes), later ones well inside the 10 minutes, each document at its own phase so a thousand
documents kept at once are not re-put in one burst.

`CustodySchedule` is the sans-I/O core (`now` passed in); `Custody` runs it on the loop over an
`Overlay`. `custodians` is the rendezvous choice of who else keeps a document.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from punchline.overlay.index import Overlay

log = structlog.get_logger(component="custody")

REFRESH = 240.0  # well before OpenDHT's 10-minute expiry, even if one re-put is lost
FIRST_REFRESH = 30.0


@dataclass
class Kept:
    key: str
    value_id: int
    document: dict[str, Any]
    until: float
    next_put: float


def _phase(key: str, value_id: int) -> float:
    """A stable fraction in [0, 1) per document: spreads re-puts over the interval."""
    digest = hashlib.sha256(f"{key}\x00{value_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


class CustodySchedule:
    def __init__(self, refresh: float = REFRESH, first_refresh: float = FIRST_REFRESH) -> None:
        self.refresh = refresh
        self.first_refresh = first_refresh
        self._kept: dict[tuple[str, int], Kept] = {}

    def keep(
        self, key: str, value_id: int, document: dict[str, Any], until: float, now: float
    ) -> bool:
        """Keep `document` until `until`; True if the caller must put it now (new or changed).

        A newer document under the same key and value id replaces the one kept.
        """
        current = self._kept.get((key, value_id))
        if current is not None and current.document == document:
            current.until = max(current.until, until)
            return False
        jitter = 0.2 * self.first_refresh * _phase(key, value_id)
        self._kept[(key, value_id)] = Kept(key, value_id, document, until,
                                           now + self.first_refresh + jitter)  # fmt: skip
        return until > now

    def release(self, key: str, value_id: int) -> None:
        self._kept.pop((key, value_id), None)

    def get(self, key: str, value_id: int) -> Kept | None:
        return self._kept.get((key, value_id))

    def due(self, now: float) -> list[Kept]:
        """Documents to put again now; those past their own expiry are forgotten."""
        out = []
        for ident, kept in list(self._kept.items()):
            if kept.until <= now:
                del self._kept[ident]
            elif kept.next_put <= now:
                jitter = 0.1 * self.refresh * _phase(kept.key, kept.value_id)
                kept.next_put = now + self.refresh - jitter
                out.append(kept)
        return out

    def next_time(self) -> float:
        return min((min(k.next_put, k.until) for k in self._kept.values()), default=float("inf"))

    def __len__(self) -> int:
        return len(self._kept)


def custodians(key: str, node_ids: Iterable[str], count: int) -> list[str]:
    """The `count` nodes that keep `key`, by rendezvous (highest random weight) hashing.

    Every supernode computes the same answer from the same list, and when a node joins or
    leaves only the keys it wins or held move.
    """

    def weight(node_id: str) -> bytes:
        return hashlib.sha256(f"{node_id}\x00{key}".encode()).digest()

    return sorted(set(node_ids), key=weight, reverse=True)[:count]


class Custody:
    """Runs a `CustodySchedule`: puts documents handed over at once, then on schedule."""

    def __init__(
        self,
        overlay: Overlay,
        schedule: CustodySchedule | None = None,
        clock: Callable[[], float] = time.time,
        concurrency: int = 16,
    ) -> None:
        self.overlay = overlay
        self.schedule = schedule if schedule is not None else CustodySchedule()
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters: dict[str, int] = {"kept": 0, "puts": 0, "reputs": 0, "put_errors": 0}

    def keep(
        self,
        key: str,
        value_id: int,
        document: dict[str, Any],
        until: float,
        put_now: bool = True,
    ) -> None:
        """Hand a signed document over: put now (if new; `put_now=False` when the caller just
        put it itself) and keep it alive until `until` (a Unix time)."""
        if self.schedule.keep(key, value_id, document, until, self._clock()):
            self.counters["kept"] += 1
            if put_now:
                self._spawn(self._put(key, value_id, document, "puts"))
        self._wake.set()

    def release(self, key: str, value_id: int) -> None:
        self.schedule.release(key, value_id)

    def status(self) -> dict[str, int]:
        return {"held": len(self.schedule), **self.counters}

    async def run(self) -> None:
        while True:
            now = self._clock()
            for kept in self.schedule.due(now):
                self._spawn(self._put(kept.key, kept.value_id, kept.document, "reputs"))
            delay = min(max(0.0, self.schedule.next_time() - self._clock()), 60.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(self, key: str, value_id: int, document: dict[str, Any], kind: str) -> None:
        async with self._limit:
            try:
                await self.overlay.put(key, value_id, document)
                self.counters[kind] += 1
            except Exception as exc:  # one failed put must not stop custody
                self.counters["put_errors"] += 1
                log.warning("custody put failed", key=key, error=str(exc))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
